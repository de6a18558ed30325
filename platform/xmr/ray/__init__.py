"""Ray behind one package: what xmr leans on that Ray does not promise (``compat``), the one
session start and its CPU sizing (``session``), the mending of Tune's saved state
(``tune_state``) and Serve's private names (``serve``). Outside this package xmr uses Ray's
public API only (``tests/test_import_structure.py``). Importing it imports no Ray."""
