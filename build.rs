// The contract bindings (`abigen!` in src/chain/contracts.rs) read chain/artifacts/*.json at
// compile time; cargo does not track those reads, so say it here.
fn main() {
    println!("cargo:rerun-if-changed=chain/artifacts");
    println!("cargo:rerun-if-changed=build.rs");
}
