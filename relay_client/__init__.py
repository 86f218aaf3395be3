"""relayc: the client that runs on the lab machine and joins visitors to local services."""
