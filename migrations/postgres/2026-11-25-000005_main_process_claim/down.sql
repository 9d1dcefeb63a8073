DROP TABLE main_process_claim;
