//! One module per subcommand.
pub mod agree;
pub mod bench;
pub mod compress;
pub mod cost;
pub mod doctor;
pub mod e2e;
pub mod eval;
pub mod factorize;
pub mod generate;
pub mod info;
pub mod init_layer;
pub mod layer_args;
pub mod parity;
pub mod quickstart;
pub mod roofline;
