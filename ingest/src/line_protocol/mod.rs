//! InfluxDB line protocol: the [`parser`] and the [`builder`] that turns parsed lines
//! into validated Arrow batches.

pub mod builder;
pub mod parser;

#[cfg(test)]
mod tests;

pub use builder::{LineError, Precision, RowContext, ValidatedLines, Validator, validate_lines};
pub use parser::{ErrorKind, FieldValue, Line, ParseError, Parser};
