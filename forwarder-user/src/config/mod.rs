//! The rule file: parsing, validation, compilation into [`crate::rules::Compiled`].
