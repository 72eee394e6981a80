//! Rebuild when a migration is added: `sqlx::migrate!` embeds the
//! migrations at compile time, and cargo does not otherwise know that it
//! reads the `migrations/` directory.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
