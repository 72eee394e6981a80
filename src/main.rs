//! The `gale` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    gale::cli::main()
}
