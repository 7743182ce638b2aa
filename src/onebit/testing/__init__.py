"""Test helpers that ship with the package (the loader fuzz harness: ``onebit.testing.fuzz``)."""
