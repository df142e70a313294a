"""A real S3 server (SeaweedFS ``weed mini``) on loopback for the tests that need one."""
