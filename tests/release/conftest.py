from tests.merge.conftest import built  # noqa: F401  (the adapters built for the merge tests)
