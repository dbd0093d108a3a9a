#!/usr/bin/env python3
"""OCPP 2.0.1 charge point for the e2e tests (see cp_v2.py)."""

from cp_v2 import main

if __name__ == "__main__":
    main("v201", "ocpp2.0.1", "201")
