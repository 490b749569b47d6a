"""`orderflow`: the operators' command line, a client of the REST gateway and the event exchange."""
