"""Frontends: how visitors reach tunnels, one module per kind behind ``base.Frontend``."""
