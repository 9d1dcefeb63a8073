-- `hs-main port` records here, in the same transaction as each copied batch,
-- how far it got in each table, so that an interrupted port resumes exactly
-- where it stopped.
CREATE TABLE port_progress (
    table_name TEXT NOT NULL PRIMARY KEY,
    last_key TEXT NOT NULL,
    rows_copied BIGINT NOT NULL,
    done BOOL NOT NULL
);
