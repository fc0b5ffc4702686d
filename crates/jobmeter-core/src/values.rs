//! Value codec of state records: versioned (see [`StateFormat`]). Writes
//! the format a meter is configured with; reads every version.

use crate::codec::Binary;
use crate::state::{Counter, DecodeError, Job, StateFormat, StatementAcc, Table};
use serde::Serialize;

/// The header of a version-1 (binary) value.
pub const BINARY_HEADER: [u8; 2] = [0x00, 0x01];

/// The format version of a stored value (0: JSON without a header).
pub fn version(b: &[u8]) -> u8 {
    match b {
        [0x00, v, ..] => *v,
        _ => 0,
    }
}

/// Encodes a state value of `table` in `format`.
pub fn encode<T: Serialize + Binary>(table: Table, v: &T, format: StateFormat) -> Result<Vec<u8>, DecodeError> {
    match format {
        StateFormat::Json => json(table, v),
        StateFormat::Binary => Ok(crate::codec::encode(&BINARY_HEADER, v)),
    }
}

/// Encodes a value as JSON (format version 0).
pub fn json<T: Serialize>(table: Table, v: &T) -> Result<Vec<u8>, DecodeError> {
    serde_json::to_vec(v).map_err(|e| DecodeError::new(table, e.to_string()))
}

/// Decodes a state value of `table`, whichever format version wrote it.
pub fn decode<T: serde::de::DeserializeOwned + Binary>(table: Table, b: &[u8]) -> Result<T, DecodeError> {
    match version(b) {
        0 => decode_json(table, b),
        1 => crate::codec::decode(&b[2..]).map_err(|e| DecodeError::new(table, format!("binary value: {}", e.0))),
        v => Err(DecodeError::new(
            table,
            format!("format version {v} is newer than this release reads"),
        )),
    }
}

/// Decodes a JSON (format version 0) value.
pub fn decode_json<T: serde::de::DeserializeOwned>(table: Table, b: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(b).map_err(|e| DecodeError::new(table, e.to_string()))
}

/// The value as JSON (format version 0), whichever format `b` is in:
/// two records hold the same state exactly when their canonical forms
/// are equal. JSON is the reference: serde writes every field the types
/// declare, so a field the binary layout forgot shows as a difference.
/// Tables without versioned values are returned as they are.
pub fn canonical(table: Table, b: &[u8]) -> Result<Vec<u8>, DecodeError> {
    match table {
        Table::Jobs => json(table, &decode::<Job>(table, b)?),
        Table::Usage => json(table, &decode::<Counter>(table, b)?),
        Table::Statements => json(table, &decode::<StatementAcc>(table, b)?),
        // A statement stored by an older release reads back with the
        // fields added since (its month's bounds, monthly cadence).
        Table::Closed => json(table, &decode_json::<crate::output::Statement>(table, b)?),
        Table::Fired | Table::Meta | Table::EventIds | Table::Expiries | Table::OpenJobs | Table::Adjustments => {
            Ok(b.to_vec())
        }
    }
}
