-- The main process's claim, proven inside the database. A process that claims
-- the database as its main process (serve, import, migrate, port's target)
-- raises `epoch` once it holds the lock and has migrated, and every write
-- transaction it runs afterwards first reads the row and checks that the epoch
-- is still its own. A process that lost its lock while a newer one took over
-- then fails its next write instead of writing beside the newcomer. One row,
-- never deleted; `holder` and `claimed_at` (ms since the Unix epoch) say who
-- raised it last, for the error message and for operators.
CREATE TABLE main_process_claim (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    claimed_at BIGINT NOT NULL
);
INSERT INTO main_process_claim (id, epoch, holder, claimed_at) VALUES (1, 0, '', 0);
