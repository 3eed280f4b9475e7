//! upload_progress: chunked, resumable uploads and real-time progress over
//! WebSocket for plain PHP-FPM. This file only wires the PHP module; the core
//! lives in pure-Rust modules (`recorder`, `hub`, `storage`, `protocol`).
#![cfg_attr(windows, feature(abi_vectorcall))]

pub mod config;
pub mod hub;
pub mod php;
pub mod protocol;
pub mod recorder;
pub mod redis_url;
pub mod secret;
pub mod storage;

use ext_php_rs::prelude::*;
use php::{errors, hub as php_hub, info, module, upload};

#[php_module]
pub fn get_module(builder: ModuleBuilder) -> ModuleBuilder {
    php::functions::register(builder)
        .startup_function(module::startup)
        .shutdown_function(module::shutdown)
        .request_startup_function(module::request_startup)
        .request_shutdown_function(php::recorder::request_shutdown)
        .info_function(info::module_info)
        .class::<errors::Exception>()
        .class::<errors::NotFoundException>()
        .class::<errors::InvalidChunkException>()
        .class::<errors::ChecksumMismatchException>()
        .class::<errors::StorageException>()
        .class::<upload::Upload>()
        .class::<php_hub::Hub>()
}
