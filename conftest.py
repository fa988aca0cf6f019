"""The checkout's own pytest configuration.

`examples/own-checks` is a user's project in miniature (its own `conftest.py` and tests,
run by tests/test_integrity_e2e.py in a directory of its own). Collected from here it would
be imported as a second top-level `conftest` module beside `tests/conftest.py`, and the
project's tests would import the wrong one; so the checkout never collects it.
"""

collect_ignore = ["examples"]
