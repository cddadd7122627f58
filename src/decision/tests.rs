//! Table tests of the pure engine (written next).
