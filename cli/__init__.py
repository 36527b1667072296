"""The ``trajstore`` command line: parsing and printing over the Python API, nothing more."""
