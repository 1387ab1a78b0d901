//! Shared helpers for openshell's end-to-end tests.

pub mod sandbox;
