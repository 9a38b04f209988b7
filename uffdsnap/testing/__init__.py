"""What only tests and the bench use: building the test and bench helper programs (helpers/)."""
