// Write load through the official Node.js driver for a fixed time, counting every
// outcome; prints one JSON summary on stdout (see bench/failover_load.py for the
// operations and how tests/test_failover.py checks them).
//
// Usage: node failover_load.js <mongodb-uri> <database> <tag> <seconds> <workers>
'use strict';

const { MongoClient } = require('mongodb');

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const [uri, dbName, tag, seconds, workers] = process.argv.slice(2);
  const client = new MongoClient(uri, {
    retryWrites: true,
    retryReads: true,
    serverSelectionTimeoutMS: 3000,
    connectTimeoutMS: 3000,
    socketTimeoutMS: 20000,
    maxPoolSize: Number(workers),
  });
  await client.connect();
  const db = client.db(dbName);
  const end = Date.now() + Number(seconds) * 1000;
  const stats = [];

  async function worker(index) {
    const s = { acked_incs: [], failed_incs: [], acked_ids: [], duplicate_keys: 0,
                errors: {}, slowest_s: 0, ok: 0 };
    stats.push(s);
    let counter = '';
    for (let k = 1; Date.now() < end; k++) {
      const step = k % 3;
      const start = Date.now();
      try {
        if (step === 0) {
          counter = `${tag}-c${index}-${k}`;
          await db.collection('counters').updateOne(
            { _id: counter }, { $inc: { n: 1 } }, { upsert: true });
          s.acked_incs.push(counter);
        } else if (step === 1) {
          const id = `${tag}-w${index}-${k}`;
          await db.collection('docs').insertOne({ _id: id });
          s.acked_ids.push(id);
        } else {
          await db.collection('counters').findOne({ _id: counter });
        }
        s.ok += 1;
      } catch (err) {
        if (step === 0) s.failed_incs.push(counter);
        if (err.code === 11000) s.duplicate_keys += 1;
        const kind = `${err.name} ${err.code ?? ''}`.trim();
        s.errors[kind] = (s.errors[kind] || 0) + 1;
        await sleep(20);
      }
      s.slowest_s = Math.max(s.slowest_s, (Date.now() - start) / 1000);
    }
  }

  await Promise.all(Array.from({ length: Number(workers) }, (_, i) => worker(i)));
  await client.close();
  console.log(JSON.stringify(stats));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
