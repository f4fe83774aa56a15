-- TurboQuant's tables as written before the byte columns became 64-bit (commit 65c2f6d)
CREATE TABLE tq_sensitivity (
	id SERIAL NOT NULL, 
	model_fingerprint VARCHAR(128) NOT NULL, 
	data_fingerprint VARCHAR(128) NOT NULL, 
	setting VARCHAR(512) NOT NULL, 
	matrix VARCHAR(512) NOT NULL, 
	kl FLOAT NOT NULL, 
	ppl FLOAT, 
	bytes INTEGER NOT NULL, 
	seconds FLOAT NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (model_fingerprint, data_fingerprint, setting, matrix)
);
CREATE INDEX ix_tq_sensitivity_data_fingerprint ON tq_sensitivity (data_fingerprint);
CREATE INDEX ix_tq_sensitivity_model_fingerprint ON tq_sensitivity (model_fingerprint);
CREATE TABLE tq_studies (
	id SERIAL NOT NULL, 
	name VARCHAR(255) NOT NULL, 
	model VARCHAR(1024) NOT NULL, 
	dataset VARCHAR(1024) NOT NULL, 
	budget_bytes INTEGER NOT NULL, 
	numel INTEGER NOT NULL, 
	sampler VARCHAR(64) NOT NULL, 
	space JSON NOT NULL, 
	provenance JSON NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_tq_studies_name ON tq_studies (name);
CREATE TABLE tq_trials (
	id SERIAL NOT NULL, 
	study_id INTEGER NOT NULL, 
	number INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	policy JSON NOT NULL, 
	bytes INTEGER, 
	bpw FLOAT, 
	kl FLOAT, 
	ppl FLOAT, 
	top1 FLOAT, 
	logit_err FLOAT, 
	feasible BOOLEAN NOT NULL, 
	seed VARCHAR(64), 
	timings JSON NOT NULL, 
	worker VARCHAR(255), 
	error TEXT, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (study_id, number), 
	FOREIGN KEY(study_id) REFERENCES tq_studies (id) ON DELETE CASCADE
);
CREATE INDEX ix_tq_trials_front ON tq_trials (study_id, state, bytes, kl);
CREATE INDEX ix_tq_trials_study_id ON tq_trials (study_id);
