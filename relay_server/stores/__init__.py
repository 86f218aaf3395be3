"""Stores: relayd's persistent state behind one async interface (``base.py``)."""
