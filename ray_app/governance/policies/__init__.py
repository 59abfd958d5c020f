"""Packaged Rego policies (data files; a package so that package-data ships them)."""
