//! `cargo run -p hvm-architecture`: every function over 80 lines outside tests and every
//! circle of imports, one per line, in the baseline's format.

fn main() {
    let found = hvm_architecture::scan();
    for (name, n) in &found.long_fns {
        println!("fn {name} {n}");
    }
    for c in &found.circles {
        println!("circle {c}");
    }
}
