//! Link librbd and librados dynamically (Debian: librbd-dev, librados-dev provide the
//! unversioned .so links).
fn main() {
    println!("cargo:rustc-link-lib=dylib=rbd");
    println!("cargo:rustc-link-lib=dylib=rados");
}
