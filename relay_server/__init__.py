"""relayd: the relay server that runs on a machine with a public address."""
