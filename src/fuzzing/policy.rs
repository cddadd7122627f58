//! The policy loader (`config::parse`, `policy::compile`) on any text: a policy is compiled or
//! refused with an error, never a panic.

use std::path::Path;

pub fn check(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(file) = crate::config::parse(text) {
        let _ = crate::policy::compile(&file, Path::new("."));
    }
}
