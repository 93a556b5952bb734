//! End-to-end tests that start real processes (host-agent, array-sim) and use real NBD
//! clients. The test files live in `tests/tests/`; this library holds their shared helpers.
