-- PostgreSQL drops the functions and the lock table its statements no
-- longer use; SQLite has nothing to drop. Kept so that both engines carry
-- the same versions.
SELECT 1;
