//! Tests of the whole engine through its public API (unit tests of single parts sit next to
//! them).

mod decide;
mod props;
mod reparse;
mod validation;
