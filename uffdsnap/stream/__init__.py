"""The migration stream: a snapshot sent to a receiver on another host as it is taken.

A stream is a sequence of records (HEADER, PAGES and HOLE in any order, END or ABORT) over TCP,
a Unix socket or a pipe; the receiver checks everything, writes the same raw, sparse image and
manifest a local snapshot would, publishes it only when the stream ended complete and verified,
and answers one line. The format is documented in docs/stream-format.md.

The public API is re-exported here flat; the implementation is private:
  _records    one record: header, kinds, flags, limits, payloads (pure, validating); the reply
  _coverage   which pages a stream has covered (a bitmap that grows as it is touched)
  _decoder    StreamDecoder: bytes in, records out, the stream's rules across records (pure)
  _encoder    Encoder (what a sender calls), encode_image (the stream of an image on disk)
  _address    tcp://HOST:PORT, HOST:PORT, unix:PATH, - (pure)
  _transport  listening, connecting, standard I/O, the reply line (trio)
  _receiver   receive_stream, serve (trio)
  _sender     StreamOptions, the staging file, TokenBucket, StreamSender (trio)
"""

from uffdsnap.image import UnnamedImageWriter
from uffdsnap.stream._address import Address, parse_address
from uffdsnap.stream._coverage import Coverage
from uffdsnap.stream._decoder import Phase, StreamDecoder
from uffdsnap.stream._encoder import Encoder, encode_image
from uffdsnap.stream._receiver import IDLE_TIMEOUT_S, Output, ReceiveResult, receive_stream, serve
from uffdsnap.stream._records import (
    DIGEST_ALGO,
    FLAG_ZSTD,
    MAGIC,
    MAX_ABORT_PAYLOAD,
    MAX_END_PAYLOAD,
    MAX_HEADER_PAYLOAD,
    MAX_OBJECT_PAGES,
    MAX_PAGES_DATA,
    RECORD_HEADER,
    STREAM_FORMAT,
    STREAM_VERSION,
    Abort,
    End,
    Hole,
    Kind,
    Pages,
    Record,
    Reply,
    StreamError,
    StreamHeader,
    data_limit,
    decode_reply,
    encode_reply,
)
from uffdsnap.stream._sender import (
    STREAM_TIMEOUT_S,
    StreamFailed,
    StreamOptions,
    StreamSender,
    TokenBucket,
    default_staging,
    open_staging,
    take_stdout,
)
from uffdsnap.stream._transport import connect, open_input, open_listener, read_reply

__all__ = [
    "DIGEST_ALGO", "FLAG_ZSTD", "IDLE_TIMEOUT_S", "MAGIC", "MAX_ABORT_PAYLOAD", "MAX_END_PAYLOAD",
    "MAX_HEADER_PAYLOAD", "MAX_OBJECT_PAGES", "MAX_PAGES_DATA", "RECORD_HEADER", "STREAM_FORMAT",
    "STREAM_TIMEOUT_S", "STREAM_VERSION", "Abort", "Address", "Coverage", "Encoder", "End",
    "Hole", "Kind", "Output", "Pages", "Phase", "ReceiveResult", "Record", "Reply",
    "StreamDecoder", "StreamError", "StreamFailed", "StreamHeader", "StreamOptions",
    "StreamSender", "TokenBucket", "UnnamedImageWriter", "connect", "data_limit",
    "decode_reply", "default_staging", "encode_image", "encode_reply", "open_input",
    "open_listener", "open_staging", "parse_address", "read_reply", "receive_stream", "serve",
    "take_stdout",
]
