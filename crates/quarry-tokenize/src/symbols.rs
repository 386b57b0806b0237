//! The doubly linked list of text pieces both merge-based tokenizers (BPE by rank,
//! SentencePiece by score) rewrite as they merge neighbours.

/// A piece of the text being merged: `text[start..start + len]`.
#[derive(Clone, Copy)]
pub(crate) struct Symbol {
    pub start: usize,
    /// Length in bytes; 0 once merged into its left neighbour.
    pub len: usize,
    pub prev: Option<usize>,
    pub next: Option<usize>,
}

/// One symbol per character of `text`, linked in order.
pub(crate) fn char_symbols(text: &str) -> Vec<Symbol> {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (start, c) in text.char_indices() {
        let index = symbols.len();
        symbols.push(Symbol {
            start,
            len: c.len_utf8(),
            prev: index.checked_sub(1),
            next: None,
        });
        if index > 0 {
            symbols[index - 1].next = Some(index);
        }
    }
    symbols
}
