//! Last-write-wins merge of sorted runs, a batch at a time.
//!
//! Compaction merges a partition's segments, each already sorted by the table's key (tags,
//! then time) with one row per identity. Decoding them all and sorting again, as
//! [`merge_last_write_wins`](crate::dedup::merge_last_write_wins) does for the buffer,
//! needs memory for every row of the partition, twice. [`SortedMerge`] instead holds one
//! batch of each run and emits merged batches as it goes, so its memory is the number of
//! runs times a batch, whatever the partition's size. The rule is the same: rows with the
//! same key collapse into one, whose fields come from the newest run that set them.
//!
//! It does no I/O. The caller asks [`SortedMerge::step`] what to do: feed input `i` its
//! next batch ([`Step::Need`]), take a merged batch ([`Step::Batch`]), or stop
//! ([`Step::Done`]). The same code thus serves a test with batches in memory and compaction
//! reading segments from the object store.

use std::cmp::Ordering;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::compute::interleave;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::row::{OwnedRow, RowConverter, Rows, SortField};

use crate::dedup::{align_to_schema, fold_runs};

/// What the caller of [`SortedMerge::step`] does next.
#[derive(Debug)]
pub enum Step {
    /// Give input `i` its next batch with [`SortedMerge::push`] (`None` once it has no more).
    Need(usize),
    /// Merged rows, in key order, aligned to the merge's schema.
    Batch(RecordBatch),
    /// Every input is exhausted and every merged row was emitted.
    Done,
}

/// Why a merge cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input's rows are not strictly increasing by key: it is not a segment Kiln wrote
    /// (or it is damaged), and merging it as sorted would lose or misplace rows.
    #[error("input {input} is not sorted by its key (tags, time) with one row per identity")]
    Unsorted { input: usize },
    #[error("merging rows")]
    Arrow(#[from] ArrowError),
}

enum State {
    /// Has no current row and may have more batches.
    Waiting,
    /// Positioned at `pos` of its current batch; in the heap.
    Ready,
    Done,
}

struct Input {
    state: State,
    /// The current batch's key rows, and the position of the current row.
    rows: Option<Rows>,
    pos: usize,
    /// Where the current batch is in [`SortedMerge::pool`].
    slot: usize,
    /// The last key of the previous batch, to check the next one continues after it.
    tail: Option<OwnedRow>,
}

/// A k-way last-write-wins merge of runs sorted by `key`; inputs are numbered oldest
/// write first.
pub struct SortedMerge {
    schema: SchemaRef,
    key: Vec<usize>,
    converter: RowConverter,
    inputs: Vec<Input>,
    /// Inputs with a current row: a binary min-heap by (key, input).
    heap: Vec<usize>,
    /// Inputs waiting for a batch; the last is asked first.
    waiting: Vec<usize>,
    /// The batches the staged rows come from.
    pool: Vec<RecordBatch>,
    /// Per staged version of a row, the (pool slot, row) it is taken from; versions of
    /// one row are adjacent, oldest first.
    picks: Vec<(usize, usize)>,
    /// The staged rows: runs of `picks` (start, end) holding the versions of one row.
    runs: Vec<(usize, usize)>,
    batch_rows: usize,
}

impl SortedMerge {
    /// A merge of `inputs` runs into batches of up to `batch_rows` rows of `schema`, by the
    /// columns `key` (names, in order).
    pub fn new(
        schema: SchemaRef,
        key: &[&str],
        inputs: usize,
        batch_rows: usize,
    ) -> Result<Self, Error> {
        let key: Vec<usize> = key
            .iter()
            .map(|k| schema.index_of(k))
            .collect::<Result<_, _>>()?;
        let converter = RowConverter::new(
            key.iter()
                .map(|&i| SortField::new(schema.field(i).data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            schema,
            key,
            converter,
            inputs: (0..inputs)
                .map(|_| Input {
                    state: State::Waiting,
                    rows: None,
                    pos: 0,
                    slot: 0,
                    tail: None,
                })
                .collect(),
            heap: Vec::with_capacity(inputs),
            waiting: (0..inputs).rev().collect(),
            pool: Vec::new(),
            picks: Vec::with_capacity(batch_rows),
            runs: Vec::with_capacity(batch_rows),
            batch_rows: batch_rows.max(1),
        })
    }

    /// Input `i`'s next batch, or `None` when it has no more. An empty batch is skipped.
    pub fn push(&mut self, i: usize, batch: Option<RecordBatch>) -> Result<(), Error> {
        let Some(batch) = batch else {
            self.inputs[i].state = State::Done;
            self.waiting.retain(|&w| w != i);
            return Ok(());
        };
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = align_to_schema(&batch, &self.schema)?;
        let key_columns: Vec<ArrayRef> = self
            .key
            .iter()
            .map(|&c| Arc::clone(batch.column(c)))
            .collect();
        let rows = self.converter.convert_columns(&key_columns)?;
        let input = &mut self.inputs[i];
        let continues = input
            .tail
            .as_ref()
            .is_none_or(|tail| tail.row() < rows.row(0));
        let increasing = (1..rows.num_rows()).all(|r| rows.row(r - 1) < rows.row(r));
        if !continues || !increasing {
            return Err(Error::Unsorted { input: i });
        }
        input.tail = Some(rows.row(rows.num_rows() - 1).owned());
        input.rows = Some(rows);
        input.pos = 0;
        input.slot = self.pool.len();
        input.state = State::Ready;
        self.waiting.retain(|&w| w != i);
        self.pool.push(batch);
        self.heap_push(i);
        Ok(())
    }

    /// What to do next.
    pub fn step(&mut self) -> Result<Step, Error> {
        loop {
            if let Some(&i) = self.waiting.last() {
                return Ok(Step::Need(i));
            }
            if self.runs.len() >= self.batch_rows || (self.heap.is_empty() && !self.runs.is_empty())
            {
                return Ok(Step::Batch(self.flush()?));
            }
            if self.heap.is_empty() {
                return Ok(Step::Done);
            }
            self.take_smallest();
        }
    }

    /// Stages the smallest key: one version from every input positioned at it, oldest
    /// first, and moves those inputs on.
    fn take_smallest(&mut self) {
        let first = self.heap_pop();
        let mut group = vec![first];
        while let Some(&top) = self.heap.first() {
            if self.compare_keys(top, first) != Ordering::Equal {
                break;
            }
            group.push(self.heap_pop());
        }
        group.sort_unstable();
        let start = self.picks.len();
        for &i in &group {
            let input = &self.inputs[i];
            self.picks.push((input.slot, input.pos));
        }
        self.runs.push((start, self.picks.len()));
        for i in group {
            let input = &mut self.inputs[i];
            input.pos += 1;
            if input.pos < input.rows.as_ref().map_or(0, Rows::num_rows) {
                self.heap_push(i);
            } else {
                input.state = State::Waiting;
                input.rows = None;
                self.waiting.push(i);
            }
        }
    }

    /// The staged rows as a batch, each row's versions folded by the last-write-wins rule
    /// ([`fold_runs`]); the pool then keeps only the batches inputs are still in.
    fn flush(&mut self) -> Result<RecordBatch, Error> {
        let columns = (0..self.schema.fields().len())
            .map(|c| {
                let arrays: Vec<&dyn Array> =
                    self.pool.iter().map(|b| b.column(c).as_ref()).collect();
                interleave(&arrays, &self.picks)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut batch = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
        if self.runs.len() < self.picks.len() {
            let order: Vec<u32> = (0..self.picks.len() as u32).collect();
            let folded = fold_runs(&batch, &order, &self.runs, &self.key)?;
            batch = RecordBatch::try_new(Arc::clone(&self.schema), folded)?;
        }
        self.picks.clear();
        self.runs.clear();
        let pool = std::mem::take(&mut self.pool);
        for input in &mut self.inputs {
            if matches!(input.state, State::Ready) {
                let slot = self.pool.len();
                self.pool.push(pool[input.slot].clone());
                input.slot = slot;
            }
        }
        Ok(batch)
    }

    fn compare_keys(&self, a: usize, b: usize) -> Ordering {
        let row = |i: usize| {
            let input = &self.inputs[i];
            input.rows.as_ref().expect("a ready input").row(input.pos)
        };
        row(a).cmp(&row(b))
    }

    /// Orders heap entries by key, then input (older first).
    fn less(&self, a: usize, b: usize) -> bool {
        self.compare_keys(a, b).then(a.cmp(&b)) == Ordering::Less
    }

    fn heap_push(&mut self, i: usize) {
        self.heap.push(i);
        let mut child = self.heap.len() - 1;
        while child > 0 {
            let parent = (child - 1) / 2;
            if !self.less(self.heap[child], self.heap[parent]) {
                break;
            }
            self.heap.swap(child, parent);
            child = parent;
        }
    }

    fn heap_pop(&mut self) -> usize {
        let top = self.heap.swap_remove(0);
        let n = self.heap.len();
        let mut parent = 0;
        loop {
            let (left, right) = (2 * parent + 1, 2 * parent + 2);
            let mut smallest = parent;
            if left < n && self.less(self.heap[left], self.heap[smallest]) {
                smallest = left;
            }
            if right < n && self.less(self.heap[right], self.heap[smallest]) {
                smallest = right;
            }
            if smallest == parent {
                break;
            }
            self.heap.swap(parent, smallest);
            parent = smallest;
        }
        top
    }
}

#[cfg(test)]
mod tests;
