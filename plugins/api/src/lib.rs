//! Plugin API (filled in by the plugins issue).
