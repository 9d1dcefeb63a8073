-- The batch's statement proves the main-process claim and takes its stream
-- positions in plain SQL: the claim's row read FOR SHARE in the statement
-- itself, and the stream positions lock a transaction-level advisory lock
-- (its key is the engine's STREAM_POSITIONS_LOCK_KEY) taken before the ids'
-- nextval. Calling PL/pgSQL for both cost the server about 80 us of a
-- message's ~430 us (pgbench -M prepared, one client, the statement of one
-- message against the same statement without the calls). So the functions
-- of versions 000007-000010 and the table the old lock was taken on go;
-- take_stream_positions_claimed (000008) was already called by nothing.
DROP FUNCTION take_stream_positions_claimed(regclass, bigint, bigint);
DROP FUNCTION prove_main_process_claim(bigint);
DROP FUNCTION take_stream_positions(regclass, bigint);
DROP TABLE stream_positions_lock;
