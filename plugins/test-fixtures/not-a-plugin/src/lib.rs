//! A shared library that is not an hvm plugin: it exports no root module. The loader
//! must refuse it with the file and the reason.

/// Something to export, so the library is not empty.
#[no_mangle]
pub extern "C" fn not_a_plugin() -> u32 {
    42
}
