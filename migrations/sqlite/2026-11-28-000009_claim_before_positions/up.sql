-- PostgreSQL's batch statements that commit on their own prove the claim
-- through a function of this version; SQLite writes one batch at a time
-- under its writer and has nothing to add. Kept so that both engines carry
-- the same versions.
SELECT 1;
