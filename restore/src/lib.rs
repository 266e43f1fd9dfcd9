//! Restore: read, validate, plan, apply, resume.
