DROP FUNCTION prove_main_process_claim(bigint);
