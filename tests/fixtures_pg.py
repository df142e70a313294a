"""A throwaway PostgreSQL cluster (Debian's postgresql-15) for the tests that need one."""
