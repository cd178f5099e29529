//! PostgreSQL functions that tools call while reflecting a schema, as far as Kiln has the
//! objects they ask about.
//!
//! Kiln has no sequences, indexes or collations of its own, so the functions about them
//! answer what PostgreSQL answers for a table without any: SQLAlchemy's column reflection
//! (`pg_get_serial_sequence`, `json_build_object` over `pg_sequence`,
//! `pg_collation_is_visible`) and index reflection (`pg_get_indexdef`, pgJDBC's
//! `information_schema._pg_expandarray` over `pg_index.indkey`) then plan and return
//! nothing for Kiln's tables.
//!
//! `_pg_expandarray(array)` is a set-returning function in PostgreSQL (one `(x, n)` row per
//! element); here it is a scalar one, exact for arrays of at most one element (none has
//! more in Kiln's empty `pg_index`) and an error for longer ones.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int32Array, StringBuilder, StructArray};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};

/// Every function of this module.
pub fn functions() -> Vec<ScalarUDF> {
    vec![
        constant("pg_get_serial_sequence", &[2], ScalarValue::Utf8(None)),
        constant("pg_get_indexdef", &[1, 3], ScalarValue::Utf8(None)),
        constant(
            "pg_collation_is_visible",
            &[1],
            ScalarValue::Boolean(Some(true)),
        ),
        ScalarUDF::new_from_impl(JsonBuildObject {
            signature: Signature::variadic_any(Volatility::Immutable),
        }),
        ScalarUDF::new_from_impl(ExpandArray {
            signature: Signature::any(1, Volatility::Immutable),
        }),
    ]
}

/// A function of any of `arities` arguments, of any type, that always returns `value`.
fn constant(name: &str, arities: &[usize], value: ScalarValue) -> ScalarUDF {
    let signatures = arities.iter().map(|n| TypeSignature::Any(*n)).collect();
    ScalarUDF::new_from_impl(Constant {
        name: name.to_owned(),
        signature: Signature::one_of(signatures, Volatility::Immutable),
        return_type: value.data_type(),
        value,
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Constant {
    name: String,
    signature: Signature,
    value: ScalarValue,
    return_type: DataType,
}

impl ScalarUDFImpl for Constant {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.return_type.clone())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.value.clone()))
    }
}

/// `json_build_object(key, value, …)`: a JSON object as text.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: Signature,
}

impl ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if !args.args.len().is_multiple_of(2) {
            return exec_err!("argument list must have even number of elements");
        }
        let rows = args.number_rows;
        let arrays: Vec<ArrayRef> = ColumnarValue::values_to_arrays(&args.args)?;
        let mut out = StringBuilder::with_capacity(rows, rows * 16);
        for row in 0..rows {
            let mut object = String::from("{");
            for (i, pair) in arrays.chunks(2).enumerate() {
                let key = ScalarValue::try_from_array(&pair[0], row)?;
                if key.is_null() {
                    return exec_err!("null value not allowed for object key");
                }
                if i > 0 {
                    object.push_str(", ");
                }
                json_string(&key.to_string(), &mut object);
                object.push_str(" : ");
                json_value(&ScalarValue::try_from_array(&pair[1], row)?, &mut object);
            }
            object.push('}');
            out.append_value(object);
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

fn json_value(value: &ScalarValue, out: &mut String) {
    if value.is_null() {
        out.push_str("null");
        return;
    }
    match value {
        ScalarValue::Boolean(Some(b)) => out.push_str(if *b { "true" } else { "false" }),
        ScalarValue::Int8(_)
        | ScalarValue::Int16(_)
        | ScalarValue::Int32(_)
        | ScalarValue::Int64(_)
        | ScalarValue::UInt8(_)
        | ScalarValue::UInt16(_)
        | ScalarValue::UInt32(_)
        | ScalarValue::UInt64(_) => out.push_str(&value.to_string()),
        ScalarValue::Float32(Some(f)) if f.is_finite() => out.push_str(&f.to_string()),
        ScalarValue::Float64(Some(f)) if f.is_finite() => out.push_str(&f.to_string()),
        other => json_string(&other.to_string(), out),
    }
}

fn json_string(text: &str, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `_pg_expandarray(array)` as a scalar function (see the module docs).
#[derive(Debug, PartialEq, Eq, Hash)]
struct ExpandArray {
    signature: Signature,
}

impl ExpandArray {
    fn fields(element: &DataType) -> Fields {
        Fields::from(vec![
            Field::new("x", element.clone(), true),
            Field::new("n", DataType::Int32, true),
        ])
    }
}

impl ScalarUDFImpl for ExpandArray {
    fn name(&self) -> &str {
        "_pg_expandarray"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match &arg_types[0] {
            DataType::List(element) => Ok(DataType::Struct(Self::fields(element.data_type()))),
            other => plan_err!("_pg_expandarray expects an array, not {other}"),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let lists = arrays[0].as_list::<i32>();
        let DataType::List(element) = lists.data_type() else {
            return exec_err!("_pg_expandarray expects an array");
        };
        let mut indices = Vec::with_capacity(lists.len());
        let mut valid = Vec::with_capacity(lists.len());
        for row in 0..lists.len() {
            let len = if lists.is_null(row) {
                0
            } else {
                lists.value_length(row)
            };
            if len > 1 {
                return exec_err!(
                    "_pg_expandarray is supported for arrays of at most one element, not {len}"
                );
            }
            valid.push(len == 1);
            indices.push(usize::try_from(lists.value_offsets()[row]).unwrap_or(0));
        }
        let values = lists.values();
        let x = arrow::compute::take(
            values.as_ref(),
            &arrow::array::UInt64Array::from(
                indices
                    .iter()
                    .zip(&valid)
                    .map(|(i, v)| v.then_some(*i as u64))
                    .collect::<Vec<_>>(),
            ),
            None,
        )?;
        let n: ArrayRef = Arc::new(Int32Array::from(
            valid.iter().map(|v| v.then_some(1)).collect::<Vec<_>>(),
        ));
        let array = StructArray::try_new(
            Self::fields(element.data_type()),
            vec![x, n],
            Some(NullBuffer::from(valid)),
        )?;
        Ok(ColumnarValue::Array(Arc::new(array)))
    }
}
