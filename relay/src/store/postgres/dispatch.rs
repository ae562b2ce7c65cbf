//! The dispatcher's tables on PostgreSQL.
