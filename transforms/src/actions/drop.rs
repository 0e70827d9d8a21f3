//! `drop`: the column is read only so that `derive` can use it, then discarded. There is
//! nothing to compute; the engine writes no output for it. Columns no policy names are dropped
//! too, before they are even decoded (default deny), and are counted by the decoder.
