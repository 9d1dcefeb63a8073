//! Rebuild when a migration is added: `embed_migrations!` reads the directories
//! at compile time, but cargo only tracks files it was told about.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
    println!("cargo:rerun-if-changed=../../migrations/sqlite");
    println!("cargo:rerun-if-changed=../../migrations/postgres");
}
