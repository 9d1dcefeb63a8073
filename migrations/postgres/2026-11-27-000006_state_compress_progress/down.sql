DROP TABLE state_compress_progress;
