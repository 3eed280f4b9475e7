//! Everything that touches the Zend engine or the SAPI.
pub mod constants;
pub mod convert;
pub mod errors;
pub mod functions;
pub mod hub;
pub mod info;
pub mod ini;
pub mod module;
pub mod recorder;
pub mod sapi;
pub mod upload;
