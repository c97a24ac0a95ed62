//! Integration tests: kernel_path.
