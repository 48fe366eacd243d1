--
-- PostgreSQL database dump
--

\restrict nMmptdCb94jHpxd2xyCayJUKZpscb0ZOSCsR1MXRm9ogZogdJYe0q4fX5WYMJeX

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: netboot_old; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA netboot_old;


--
-- Name: netboot_record_change(); Type: FUNCTION; Schema: netboot_old; Owner: -
--

CREATE FUNCTION netboot_old.netboot_record_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
        DECLARE
            old_key TEXT;
            new_key TEXT;
        BEGIN
            PERFORM pg_advisory_xact_lock(31073797980254068);
            IF TG_OP <> 'INSERT' THEN old_key := to_jsonb(OLD) ->> TG_ARGV[0]; END IF;
            IF TG_OP <> 'DELETE' THEN new_key := to_jsonb(NEW) ->> TG_ARGV[0]; END IF;
            IF old_key IS NOT NULL AND old_key IS DISTINCT FROM new_key THEN
                INSERT INTO changes (tbl, key) VALUES (TG_TABLE_NAME, old_key);
            END IF;
            IF new_key IS NOT NULL THEN
                INSERT INTO changes (tbl, key) VALUES (TG_TABLE_NAME, new_key);
            END IF;
            -- Delivered at commit, once per transaction (equal notifications fold into one).
            PERFORM pg_notify('netboot_changes', '');
            RETURN NULL;
        END $$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: api_tokens; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.api_tokens (
    name text NOT NULL COLLATE pg_catalog."C",
    sha256 text NOT NULL COLLATE pg_catalog."C",
    scope text NOT NULL,
    created double precision NOT NULL,
    expires double precision,
    last_used double precision
);


--
-- Name: audit; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.audit (
    id bigint NOT NULL,
    "time" double precision NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    peer text NOT NULL,
    outcome text NOT NULL
);


--
-- Name: audit_id_seq; Type: SEQUENCE; Schema: netboot_old; Owner: -
--

CREATE SEQUENCE netboot_old.audit_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: audit_id_seq; Type: SEQUENCE OWNED BY; Schema: netboot_old; Owner: -
--

ALTER SEQUENCE netboot_old.audit_id_seq OWNED BY netboot_old.audit.id;


--
-- Name: changes; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.changes (
    seq bigint NOT NULL,
    tbl text NOT NULL COLLATE pg_catalog."C",
    key text NOT NULL COLLATE pg_catalog."C"
);


--
-- Name: changes_seq_seq; Type: SEQUENCE; Schema: netboot_old; Owner: -
--

CREATE SEQUENCE netboot_old.changes_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: changes_seq_seq; Type: SEQUENCE OWNED BY; Schema: netboot_old; Owner: -
--

ALTER SEQUENCE netboot_old.changes_seq_seq OWNED BY netboot_old.changes.seq;


--
-- Name: clusters; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.clusters (
    name text NOT NULL COLLATE pg_catalog."C",
    data text NOT NULL
);


--
-- Name: commit_marks; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.commit_marks (
    id uuid NOT NULL,
    lost boolean DEFAULT false NOT NULL
);


--
-- Name: events; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.events (
    id bigint NOT NULL,
    machine text NOT NULL COLLATE pg_catalog."C",
    "time" double precision NOT NULL,
    kind text NOT NULL,
    message text NOT NULL,
    data text NOT NULL
);


--
-- Name: events_id_seq; Type: SEQUENCE; Schema: netboot_old; Owner: -
--

CREATE SEQUENCE netboot_old.events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: events_id_seq; Type: SEQUENCE OWNED BY; Schema: netboot_old; Owner: -
--

ALTER SEQUENCE netboot_old.events_id_seq OWNED BY netboot_old.events.id;


--
-- Name: groups; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.groups (
    name text NOT NULL COLLATE pg_catalog."C",
    data text NOT NULL
);


--
-- Name: leases; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.leases (
    mac text NOT NULL COLLATE pg_catalog."C",
    ipv4 text NOT NULL COLLATE pg_catalog."C",
    expires double precision NOT NULL,
    hostname text
);


--
-- Name: machine_keys; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.machine_keys (
    kind text NOT NULL COLLATE pg_catalog."C",
    value text NOT NULL COLLATE pg_catalog."C",
    machine text NOT NULL COLLATE pg_catalog."C"
);


--
-- Name: machine_labels; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.machine_labels (
    machine text NOT NULL COLLATE pg_catalog."C",
    key text NOT NULL COLLATE pg_catalog."C",
    value text NOT NULL COLLATE pg_catalog."C"
);


--
-- Name: machines; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.machines (
    id text NOT NULL COLLATE pg_catalog."C",
    mac text COLLATE pg_catalog."C",
    hostname text COLLATE pg_catalog."C",
    state text NOT NULL COLLATE pg_catalog."C",
    cluster text COLLATE pg_catalog."C",
    data text NOT NULL,
    created double precision NOT NULL,
    updated double precision NOT NULL
);


--
-- Name: profiles; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.profiles (
    name text NOT NULL COLLATE pg_catalog."C",
    data text NOT NULL
);


--
-- Name: schema_migrations; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.schema_migrations (
    version integer NOT NULL,
    description text NOT NULL,
    applied double precision NOT NULL
);


--
-- Name: settings; Type: TABLE; Schema: netboot_old; Owner: -
--

CREATE TABLE netboot_old.settings (
    key text NOT NULL COLLATE pg_catalog."C",
    value text NOT NULL
);


--
-- Name: audit id; Type: DEFAULT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.audit ALTER COLUMN id SET DEFAULT nextval('netboot_old.audit_id_seq'::regclass);


--
-- Name: changes seq; Type: DEFAULT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.changes ALTER COLUMN seq SET DEFAULT nextval('netboot_old.changes_seq_seq'::regclass);


--
-- Name: events id; Type: DEFAULT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.events ALTER COLUMN id SET DEFAULT nextval('netboot_old.events_id_seq'::regclass);


--
-- Data for Name: api_tokens; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.api_tokens (name, sha256, scope, created, expires, last_used) FROM stdin;
admin	ae7edb9a2bf54a577831c9271857a0800c842fcc60c205f009c3e080304ee2f9	admin	1796539266.7721076	\N	\N
ci	3c1e20c9e2310ec30be2be08a529fc0748b403334693239708fb9489fa833eaa	operator	1796539264.514422	\N	1796539267.5663564
\.


--
-- Data for Name: audit; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.audit (id, "time", actor, action, target, peer, outcome) FROM stdin;
1	1796539240.2011325	cli:root	clusters add	edge	local	ok
2	1796539244.0417767	cli:root	profiles add	k3os	local	ok
3	1796539248.068286	cli:root	groups add	rack1	local	ok
4	1796539251.2417722	cli:root	machines add	52:54:00:30:00:01	local	ok
5	1796539255.5592384	cli:root	machines add	52:54:00:30:00:02	local	ok
6	1796539260.017226	cli:root	machines add	52:54:00:30:00:03	local	ok
7	1796539264.5359468	cli:root	tokens create	ci	local	ok
8	1796539267.7450051	machine:m-e47ae21f8333	POST /api/v1/machines/{ref}/events	52:54:00:30:00:01	127.0.0.1	201
9	1796539267.7560153	machine:m-e47ae21f8333	POST /api/v1/register	m-e47ae21f8333	127.0.0.1	200
\.


--
-- Data for Name: changes; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.changes (seq, tbl, key) FROM stdin;
1	settings	secrets-key-id
2	clusters	edge
3	profiles	k3os
4	groups	rack1
5	machines	m-e47ae21f8333
6	machines	m-6718e28cc0a1
7	machines	m-cf685931f130
8	settings	cluster-init/edge
9	machines	m-e47ae21f8333
10	machines	m-e47ae21f8333
11	machines	m-e47ae21f8333
12	machines	m-e47ae21f8333
13	machines	m-6718e28cc0a1
14	machines	m-d80ed14efe01
\.


--
-- Data for Name: clusters; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.clusters (name, data) FROM stdin;
edge	{"name":"edge","server_url":"managed","token":"nbs1:35f65d5ae1e798e7:bGQQtRpbJynglGVN3eMw_JQs3DpsuMFb8_qadI_uSDPV6d5z0xrq9f9XSeJa2v0Q5C1lgYPnFzTXjEFsiBFuWjY7Ddbbsob_uJqCtW-005Q4wKAtHj8_x4loieM","labels":{},"taints":[],"description":"","endpoint":"k3s.example"}
\.


--
-- Data for Name: commit_marks; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.commit_marks (id, lost) FROM stdin;
01a24a15-4e47-6dc9-c4b7-0130ca1aa748	f
01a24a15-4e98-4686-98da-b5e3f8c25c43	f
01a24a15-4efe-a60d-9216-e27ffe6df48c	f
01a24a15-4f0a-0a54-2624-ab3cf6a147ef	f
01a24a15-5d79-a423-21e6-4b2d1d71757a	f
01a24a15-5dd8-af45-8cde-239bdeb4941b	f
01a24a15-5df0-4816-cd18-bf8c095f8bbb	f
01a24a15-5e1a-f44a-1144-a2b5d4b00249	f
01a24a15-6d23-f5d4-3149-3c1ab13afc2f	f
01a24a15-6d43-cd8c-ed11-c0a9c0f7e5e5	f
01a24a15-6dbe-8f63-043b-8b4a5a33deae	f
01a24a15-6dcb-4d7c-be13-8800a16fa285	f
01a24a15-7939-5b4f-b26a-2c86dfbc00b3	f
01a24a15-798c-e04b-ee25-7bc98f38369d	f
01a24a15-79f7-f129-329a-93c9da80afa4	f
01a24a15-7a34-7e2d-14b1-3ea2cf22fe9e	f
01a24a15-89e4-1f7d-6acb-0ea16a2b3689	f
01a24a15-8a1c-8a26-bc68-8f5cf4a37327	f
01a24a15-8ac6-b5e4-8b22-8455db8e2f23	f
01a24a15-8b08-e150-7397-b3fc03e215ad	f
01a24a15-9b91-c4c8-c3f8-91f2a27b6686	f
01a24a15-9bdf-46a1-c5ea-3133b4212d43	f
01a24a15-9c24-e5a4-eebb-97bfecf913d4	f
01a24a15-9c74-b06f-aa73-cb4e8db4a2ff	f
01a24a15-ada7-a82e-7606-0be563cc8206	f
01a24a15-adf0-6a37-b43e-e24610ae21bb	f
01a24a15-ae1e-f531-a835-0a71b03b06d3	f
01a24a15-b548-5a58-ffee-474fb37114e6	f
01a24a15-b593-9bf3-f300-8edfa5644265	f
01a24a15-b9ff-866c-ad0d-3f75f217749e	f
01a24a15-ba06-0cf8-8214-066967e818fb	f
01a24a15-ba7c-6b59-66df-f0d87a4236a1	f
01a24a15-baa2-5530-8ac2-f0136a28827a	f
01a24a15-bab0-3e85-7757-fdab14442581	f
01a24a15-bac7-ebd6-77c4-c94a2a557cd6	f
01a24a15-bae1-be50-8d2c-14ea11b8f370	f
\.


--
-- Data for Name: events; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.events (id, machine, "time", kind, message, data) FROM stdin;
1	m-e47ae21f8333	1796539251.179781	enrolled	added with the CLI	{}
2	m-6718e28cc0a1	1796539255.4834251	enrolled	added with the CLI	{}
3	m-cf685931f130	1796539259.924588	enrolled	added with the CLI	{}
4	m-e47ae21f8333	1796539267.586573	install-plan	install profile k3os into cluster edge as server	{"via":"http","firmware":"ipxe","arch":"x86_64","mac":"52:54:00:30:00:01","peer":"127.0.0.1"}
5	m-e47ae21f8333	1796539267.7026262	config	k3OS config fetched	{}
6	m-e47ae21f8333	1796539267.745231	installed		{}
7	m-e47ae21f8333	1796539267.755996	registered	registered at 192.0.2.51 (reported) as node-1; ignored peer address '127.0.0.1' (loopback); its install token is spent	{"addresses":["192.0.2.51"],"peer":"127.0.0.1","refused":[{"address":"127.0.0.1","reason":"loopback","source":"peer"}]}
8	m-6718e28cc0a1	1796539267.7812705	install-plan	install profile k3os into cluster edge as agent	{"via":"http","firmware":"ipxe","arch":"x86_64","mac":"52:54:00:30:00:02","peer":"127.0.0.1"}
9	m-d80ed14efe01	1796539267.8082068	discovered	unknown ipxe/x86_64 machine seen via http	{"via":"http","firmware":"ipxe","arch":"x86_64","mac":"52:54:00:30:00:09","peer":"127.0.0.1"}
\.


--
-- Data for Name: groups; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.groups (name, data) FROM stdin;
rack1	{"name":"rack1","selector":{"rack":["r1"]},"profile":"k3os","cluster":"edge","role":null,"labels":{},"taints":[],"hostname_template":null,"loader":null}
\.


--
-- Data for Name: leases; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.leases (mac, ipv4, expires, hostname) FROM stdin;
\.


--
-- Data for Name: machine_keys; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.machine_keys (kind, value, machine) FROM stdin;
mac	52:54:00:30:00:01	m-e47ae21f8333
mac	52:54:00:30:00:02	m-6718e28cc0a1
mac	52:54:00:30:00:03	m-cf685931f130
mac	52:54:00:30:00:09	m-d80ed14efe01
serial	S-UNKNOWN	m-d80ed14efe01
\.


--
-- Data for Name: machine_labels; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.machine_labels (machine, key, value) FROM stdin;
m-cf685931f130	rack	r1
\.


--
-- Data for Name: machines; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.machines (id, mac, hostname, state, cluster, data, created, updated) FROM stdin;
m-cf685931f130	52:54:00:30:00:03	node-3	enrolled	\N	{"id":"m-cf685931f130","macs":["52:54:00:30:00:03"],"state":"enrolled","hostname":"node-3","uuid":null,"serial":null,"asset":null,"labels":{"rack":"r1"},"cluster":null,"role":null,"profile":null,"loader":null,"arch":null,"firmware":null,"ipv4":null,"fixed_ipv4":null,"facts":{},"token_hash":null,"token_expires":null,"install_token":null,"created":1796539259.924588,"updated":1796539259.924588}	1796539259.924588	1796539259.924588
m-e47ae21f8333	52:54:00:30:00:01	node-1	registered	edge	{"id":"m-e47ae21f8333","macs":["52:54:00:30:00:01"],"state":"registered","hostname":"node-1","uuid":null,"serial":null,"asset":null,"labels":{},"cluster":"edge","role":"server","profile":"k3os","loader":null,"arch":"x86_64","firmware":"ipxe","ipv4":"192.0.2.51","fixed_ipv4":null,"facts":{"remote_addr":"127.0.0.1","install_peer":"127.0.0.1","machine_id":"m-1"},"token_hash":"deb4ef5a94636e59468b224552ceca0be71d61b77a9c97308388a0d8d6351303","token_expires":1796542867.58647,"install_token":null,"created":1796539251.179781,"updated":1796539267.7559683}	1796539251.179781	1796539267.7559683
m-6718e28cc0a1	52:54:00:30:00:02	node-2	booting	edge	{"id":"m-6718e28cc0a1","macs":["52:54:00:30:00:02"],"state":"booting","hostname":"node-2","uuid":null,"serial":null,"asset":null,"labels":{},"cluster":"edge","role":"agent","profile":"k3os","loader":null,"arch":"x86_64","firmware":"ipxe","ipv4":null,"fixed_ipv4":null,"facts":{"remote_addr":"127.0.0.1","install_peer":"127.0.0.1"},"token_hash":"f4d93a9f62c1d5d61223056fdd034a0b1fb5e1ec2876964c439b8cf7cb500519","token_expires":1796542867.781203,"install_token":"nbs1:35f65d5ae1e798e7:PHN51MeGn6w3klpP9v_badmeFAa_9-_yKpSVgdi_byeP955GA1sORykQp3IvOAz6-vQJAEE-960-ax3w","created":1796539255.4834251,"updated":1796539267.781203}	1796539255.4834251	1796539267.781203
m-d80ed14efe01	52:54:00:30:00:09	\N	discovered	\N	{"id":"m-d80ed14efe01","macs":["52:54:00:30:00:09"],"state":"discovered","hostname":null,"uuid":null,"serial":"S-UNKNOWN","asset":null,"labels":{},"cluster":null,"role":null,"profile":null,"loader":null,"arch":"x86_64","firmware":"ipxe","ipv4":null,"fixed_ipv4":null,"facts":{"manufacturer":"QEMU","remote_addr":"127.0.0.1"},"token_hash":null,"token_expires":null,"install_token":null,"created":1796539267.8073545,"updated":1796539267.8073545}	1796539267.8073545	1796539267.8073545
\.


--
-- Data for Name: profiles; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.profiles (name, data) FROM stdin;
k3os	{"name":"k3os","kernel":"vmlinuz","initrds":["initrd.img"],"cmdline":"","config_template":"k3os","assets":[],"install_device":"/dev/sda","iso_url":null,"ssh_authorized_keys":[],"fdtdir":null,"loader":null,"description":"","install_timeout":null}
\.


--
-- Data for Name: schema_migrations; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.schema_migrations (version, description, applied) FROM stdin;
1	the inventory: machines, identifiers, labels, profiles, clusters, groups, events, leases, settings, API tokens, audit log, change feed	1796539239.9560435
2	drop the UUID and serial expression indexes: machine_keys answers every lookup by identifier (as in SQLite's migration 6)	1796539239.9624214
3	drop the (state, mac) index (as in SQLite's migration 7): counts by state come from the view or one grouped scan; without an index on state, a state change is a HOT update where the page has room	1796539239.9628081
4	commit marks: a write's random key, written in its transaction, which settles a COMMIT whose answer was lost (written or not) even after a failover or a crash gave its transaction id to another writer	1796539239.9802256
\.


--
-- Data for Name: settings; Type: TABLE DATA; Schema: netboot_old; Owner: -
--

COPY netboot_old.settings (key, value) FROM stdin;
secrets-key-id	35f65d5ae1e798e7
cluster-init/edge	m-e47ae21f8333
\.


--
-- Name: audit_id_seq; Type: SEQUENCE SET; Schema: netboot_old; Owner: -
--

SELECT pg_catalog.setval('netboot_old.audit_id_seq', 9, true);


--
-- Name: changes_seq_seq; Type: SEQUENCE SET; Schema: netboot_old; Owner: -
--

SELECT pg_catalog.setval('netboot_old.changes_seq_seq', 14, true);


--
-- Name: events_id_seq; Type: SEQUENCE SET; Schema: netboot_old; Owner: -
--

SELECT pg_catalog.setval('netboot_old.events_id_seq', 9, true);


--
-- Name: api_tokens api_tokens_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.api_tokens
    ADD CONSTRAINT api_tokens_pkey PRIMARY KEY (name);


--
-- Name: api_tokens api_tokens_sha256_key; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.api_tokens
    ADD CONSTRAINT api_tokens_sha256_key UNIQUE (sha256);


--
-- Name: audit audit_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.audit
    ADD CONSTRAINT audit_pkey PRIMARY KEY (id);


--
-- Name: changes changes_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.changes
    ADD CONSTRAINT changes_pkey PRIMARY KEY (seq);


--
-- Name: clusters clusters_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.clusters
    ADD CONSTRAINT clusters_pkey PRIMARY KEY (name);


--
-- Name: commit_marks commit_marks_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.commit_marks
    ADD CONSTRAINT commit_marks_pkey PRIMARY KEY (id);


--
-- Name: events events_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (id);


--
-- Name: groups groups_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.groups
    ADD CONSTRAINT groups_pkey PRIMARY KEY (name);


--
-- Name: leases leases_ipv4_key; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.leases
    ADD CONSTRAINT leases_ipv4_key UNIQUE (ipv4);


--
-- Name: leases leases_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.leases
    ADD CONSTRAINT leases_pkey PRIMARY KEY (mac);


--
-- Name: machine_keys machine_keys_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machine_keys
    ADD CONSTRAINT machine_keys_pkey PRIMARY KEY (kind, value);


--
-- Name: machine_labels machine_labels_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machine_labels
    ADD CONSTRAINT machine_labels_pkey PRIMARY KEY (machine, key);


--
-- Name: machines machines_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machines
    ADD CONSTRAINT machines_pkey PRIMARY KEY (id);


--
-- Name: profiles profiles_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.profiles
    ADD CONSTRAINT profiles_pkey PRIMARY KEY (name);


--
-- Name: schema_migrations schema_migrations_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);


--
-- Name: settings settings_pkey; Type: CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.settings
    ADD CONSTRAINT settings_pkey PRIMARY KEY (key);


--
-- Name: audit_time; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX audit_time ON netboot_old.audit USING btree ("time", id);


--
-- Name: events_machine; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX events_machine ON netboot_old.events USING btree (machine, id);


--
-- Name: machine_keys_machine; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machine_keys_machine ON netboot_old.machine_keys USING btree (machine);


--
-- Name: machine_labels_kv; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machine_labels_kv ON netboot_old.machine_labels USING btree (key, value, machine);


--
-- Name: machines_cluster; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machines_cluster ON netboot_old.machines USING btree (cluster, mac);


--
-- Name: machines_hostname; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE UNIQUE INDEX machines_hostname ON netboot_old.machines USING btree (translate(hostname, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'::text, 'abcdefghijklmnopqrstuvwxyz'::text)) WHERE (hostname IS NOT NULL);


--
-- Name: machines_no_mac; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machines_no_mac ON netboot_old.machines USING btree (id) WHERE (mac IS NULL);


--
-- Name: machines_order; Type: INDEX; Schema: netboot_old; Owner: -
--

CREATE INDEX machines_order ON netboot_old.machines USING btree (((mac IS NULL)), mac, id);


--
-- Name: clusters clusters_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER clusters_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.clusters FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('name');


--
-- Name: groups groups_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER groups_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.groups FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('name');


--
-- Name: machines machines_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER machines_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.machines FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('id');


--
-- Name: profiles profiles_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER profiles_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.profiles FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('name');


--
-- Name: settings settings_changes; Type: TRIGGER; Schema: netboot_old; Owner: -
--

CREATE TRIGGER settings_changes AFTER INSERT OR DELETE OR UPDATE ON netboot_old.settings FOR EACH ROW EXECUTE FUNCTION netboot_old.netboot_record_change('key');


--
-- Name: machine_keys machine_keys_machine_fkey; Type: FK CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machine_keys
    ADD CONSTRAINT machine_keys_machine_fkey FOREIGN KEY (machine) REFERENCES netboot_old.machines(id) ON DELETE CASCADE;


--
-- Name: machine_labels machine_labels_machine_fkey; Type: FK CONSTRAINT; Schema: netboot_old; Owner: -
--

ALTER TABLE ONLY netboot_old.machine_labels
    ADD CONSTRAINT machine_labels_machine_fkey FOREIGN KEY (machine) REFERENCES netboot_old.machines(id) ON DELETE CASCADE;


--
-- PostgreSQL database dump complete
--

\unrestrict nMmptdCb94jHpxd2xyCayJUKZpscb0ZOSCsR1MXRm9ogZogdJYe0q4fX5WYMJeX

