//! Training loops, one module per stage; they drive the same stages as inference.
