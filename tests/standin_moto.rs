//! The corrected moto stand-in (tests/standins/moto_launcher.py), tested on its own against the EC2 API
//! reference's RegisterImage semantics: DescribeImages returns the block device mappings, root device, boot mode,
//! architecture, ENA flag and image tags the AMI was registered with, and registering over existing snapshots
//! makes no snapshot of its own. Stock moto drops all of these (shared/notes/cross-cloud.md section 4).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use util::aws::ec2_py;

#[test]
fn register_image_keeps_what_the_api_reference_says_it_keeps() {
    let out = ec2_py(
        "v=c.create_volume(Size=2,AvailabilityZone='us-east-1a')['VolumeId']\n\
         s1=c.create_snapshot(VolumeId=v)['SnapshotId']\n\
         s2=c.create_snapshot(VolumeId=v)['SnapshotId']\n\
         before=len(c.describe_snapshots(OwnerIds=['self'])['Snapshots'])\n\
         r=c.register_image(Name='standin-check',RootDeviceName='/dev/xvda',Architecture='arm64',BootMode='uefi',\n\
           EnaSupport=True,BlockDeviceMappings=[\n\
             {'DeviceName':'/dev/xvda','Ebs':{'SnapshotId':s1,'VolumeSize':2,'VolumeType':'gp3','DeleteOnTermination':True}},\n\
             {'DeviceName':'/dev/sdb','Ebs':{'SnapshotId':s2,'VolumeSize':3}}],\n\
           TagSpecifications=[{'ResourceType':'image','Tags':[{'Key':'k','Value':'v'}]}])\n\
         i=c.describe_images(ImageIds=[r['ImageId']])['Images'][0]\n\
         after=len(c.describe_snapshots(OwnerIds=['self'])['Snapshots'])\n\
         m=[(b['DeviceName'],b['Ebs']['SnapshotId']==(s1 if n==0 else s2),b['Ebs']['VolumeSize']) for n,b in enumerate(i['BlockDeviceMappings'])]\n\
         print(json.dumps({'m':m,'boot':i.get('BootMode'),'ena':i.get('EnaSupport'),'root':i.get('RootDeviceName'),\n\
           'arch':i.get('Architecture'),'tags':i.get('Tags'),'new_snapshots':after-before}))\n\
         p=c.register_image(Name='standin-plain',RootDeviceName='/dev/xvda',BlockDeviceMappings=[{'DeviceName':'/dev/xvda','Ebs':{'SnapshotId':s1}}])\n\
         j=c.describe_images(ImageIds=[p['ImageId']])['Images'][0]\n\
         print(json.dumps({'boot':j.get('BootMode'),'ena':j.get('EnaSupport')}))",
    );
    let mut lines = out.lines();
    let v: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        v["m"],
        serde_json::json!([["/dev/xvda", true, 2], ["/dev/sdb", true, 3]])
    );
    assert_eq!(v["boot"], "uefi");
    assert_eq!(v["ena"], true);
    assert_eq!(v["root"], "/dev/xvda");
    assert_eq!(v["arch"], "arm64");
    assert_eq!(v["tags"], serde_json::json!([{"Key": "k", "Value": "v"}]));
    assert_eq!(v["new_snapshots"], 0, "RegisterImage made a snapshot");
    // Registered without a boot mode or ENA flag: the image has none (EC2 decides at launch).
    let p: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(p["boot"], serde_json::Value::Null);
    assert_eq!(p["ena"], serde_json::Value::Null);
}

/// Account B, as moto names accounts: the header `x-moto-account-id` picks the account's backend.
const ACCOUNT_B: &str = "222233334444";

/// moto_launcher.py's `describe_images_sees_amis_shared_by_other_accounts`, against the EC2 API reference's
/// DescribeImages: images available to a caller are its own, public ones, and other accounts' with an explicit
/// launch permission for it; ImageIds leaves out what it cannot launch; Owners and ExecutableUsers scope them.
/// Another account still cannot change an AMI it does not own.
#[test]
fn describe_images_shows_other_accounts_amis_only_as_launch_permissions_allow() {
    let out = ec2_py(&format!(
        "B='{ACCOUNT_B}'\n\
         b=boto3.client('ec2',endpoint_url=c.meta.endpoint_url,region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t')\n\
         b.meta.events.register('before-sign.ec2.*',lambda request,**kw: request.headers.__setitem__('x-moto-account-id',B))\n\
         A=c.describe_images(Owners=['self'])  # touch account A\n\
         v=c.create_volume(Size=1,AvailabilityZone='us-east-1a')['VolumeId']\n\
         s=c.create_snapshot(VolumeId=v)['SnapshotId']\n\
         def reg(n):\n\
         \x20   return c.register_image(Name=n,RootDeviceName='/dev/xvda',BlockDeviceMappings=[{{'DeviceName':'/dev/xvda','Ebs':{{'SnapshotId':s}}}}])['ImageId']\n\
         import uuid\n\
         u=uuid.uuid4().hex[:8]\n\
         shared,private,public=reg('shared-'+u),reg('private-'+u),reg('public-'+u)\n\
         c.modify_image_attribute(ImageId=shared,LaunchPermission={{'Add':[{{'UserId':B}}]}})\n\
         c.modify_image_attribute(ImageId=public,LaunchPermission={{'Add':[{{'Group':'all'}}]}})\n\
         ids=lambda r:sorted(i['ImageId'] for i in r['Images'] if i['ImageId'] in (shared,private,public))\n\
         def err(f):\n\
         \x20   try:\n\
         \x20       f(); return None\n\
         \x20   except Exception as e:\n\
         \x20       return e.response['Error']['Code']\n\
         owner=b.describe_images(ImageIds=[shared])['Images'][0]['OwnerId']\n\
         r={{'names':{{shared:'shared',private:'private',public:'public'}},\n\
            'by_id':ids(b.describe_images(ImageIds=[shared])),'owner':owner,\n\
            'private_by_id':err(lambda: b.describe_images(ImageIds=[private])),\n\
            'none':ids(b.describe_images()),\n\
            'exec_self':ids(b.describe_images(ExecutableUsers=['self'])),\n\
            'exec_all':ids(b.describe_images(ExecutableUsers=['all'])),\n\
            'owners_a':ids(b.describe_images(Owners=[owner])),\n\
            'owners_self':ids(b.describe_images(Owners=['self'])),\n\
            'a_self':ids(c.describe_images(Owners=['self'])),\n\
            'b_modify':err(lambda: b.modify_image_attribute(ImageId=shared,LaunchPermission={{'Add':[{{'UserId':'999988887777'}}]}}))}}\n\
         c.modify_image_attribute(ImageId=shared,LaunchPermission={{'Remove':[{{'UserId':B}}]}})\n\
         r['after_unshare']=err(lambda: b.describe_images(ImageIds=[shared]))\n\
         print(json.dumps(r))"
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let names = |key: &str| -> Vec<String> {
        let mut n: Vec<String> = v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                v["names"][i.as_str().unwrap()]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        n.sort();
        n
    };
    assert_eq!(names("by_id"), ["shared"]);
    assert_ne!(v["owner"], ACCOUNT_B, "the AMI is still account A's");
    assert_eq!(v["private_by_id"], "InvalidAMIID.NotFound");
    assert_eq!(names("none"), ["public", "shared"]);
    assert_eq!(names("exec_self"), ["shared"]);
    assert_eq!(names("exec_all"), ["public"]);
    assert_eq!(names("owners_a"), ["public", "shared"]);
    assert!(names("owners_self").is_empty());
    assert_eq!(names("a_self"), ["private", "public", "shared"]);
    assert_eq!(v["b_modify"], "InvalidAMIID.NotFound");
    assert_eq!(v["after_unshare"], "InvalidAMIID.NotFound");
}

/// moto_launcher.py's `copy_image_honouring_client_token_and_tags`, against the EC2 API reference's CopyImage:
/// the same ClientToken with the same parameters returns the first copy (no second one), with other parameters
/// fails with IdempotentParameterMismatch; TagSpecifications tag the copy; CopyImageTags copies the source's
/// user tags.
#[test]
fn copy_image_is_idempotent_by_client_token_and_tags_the_copy() {
    let out = ec2_py(
        "import uuid\n\
         u=uuid.uuid4().hex[:8]\n\
         w=boto3.client('ec2',endpoint_url=c.meta.endpoint_url,region_name='eu-central-1',aws_access_key_id='t',aws_secret_access_key='t')\n\
         v=c.create_volume(Size=1,AvailabilityZone='us-east-1a')['VolumeId']\n\
         s=c.create_snapshot(VolumeId=v)['SnapshotId']\n\
         src=c.register_image(Name='src-'+u,RootDeviceName='/dev/xvda',BlockDeviceMappings=[{'DeviceName':'/dev/xvda','Ebs':{'SnapshotId':s}}],\n\
           TagSpecifications=[{'ResourceType':'image','Tags':[{'Key':'team','Value':'x'}]}])['ImageId']\n\
         def cp(tok,name):\n\
         \x20   return w.copy_image(SourceImageId=src,SourceRegion='us-east-1',Name=name,ClientToken=tok,CopyImageTags=True,\n\
         \x20     TagSpecifications=[{'ResourceType':'image','Tags':[{'Key':'k','Value':'v'}]}])['ImageId']\n\
         a=cp('tok-'+u,'copy-'+u)\n\
         b=cp('tok-'+u,'copy-'+u)\n\
         try:\n\
         \x20   cp('tok-'+u,'other-'+u); mismatch=None\n\
         except Exception as e:\n\
         \x20   mismatch=e.response['Error']['Code']\n\
         n=len([i for i in w.describe_images(Owners=['self'])['Images'] if i['Name']=='copy-'+u])\n\
         t=sorted((x['Key'],x['Value']) for x in w.describe_images(ImageIds=[a])['Images'][0].get('Tags',[]))\n\
         c1=cp('tok2-'+u,'copy2-'+u); c2=cp('tok3-'+u,'copy2-'+u)\n\
         print(json.dumps({'same':a==b,'n':n,'mismatch':mismatch,'tags':t,'distinct':c1!=c2}))",
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["same"], true, "the same token made another copy");
    assert_eq!(v["n"], 1);
    assert_eq!(v["mismatch"], "IdempotentParameterMismatch");
    assert_eq!(v["tags"], serde_json::json!([["k", "v"], ["team", "x"]]));
    assert_eq!(v["distinct"], true, "other tokens make other copies");
}

// ---- EBS direct: incremental snapshots (the launcher's `fix_ebs_lineage`) ----
//
// Each test below checks one correction against the EBS direct API reference
// (https://docs.aws.amazon.com/ebs/latest/APIReference/): API_StartSnapshot.html (ParentSnapshotId; "You can't
// specify ParentSnapshotId and Encrypted in the same request"), API_ListChangedBlocks.html (blocks that differ
// between two snapshots of one lineage; FirstBlockToken "absent if the first snapshot does not have the changed
// block that is on the second snapshot", SecondBlockToken likewise; MaxResults 100-10000; "If you specify
// NextToken, then StartingBlockIndex is ignored"), API_ValidationException.html (Reason UNRELATED_SNAPSHOTS,
// INVALID_PAGE_TOKEN), API_ResourceNotFoundException.html (Reason SNAPSHOT_NOT_FOUND,
// DEPENDENCY_RESOURCE_NOT_FOUND) and the 524288-byte BlockSize. Stock moto fails every one of them.

/// Runs Python `code` with `e` an EBS client and `c` an EC2 client on moto (in an account of their own,
/// `x-moto-account-id`, so the RegisterImage test's snapshot count in the default account is not disturbed by
/// these running beside it), and helpers: `put(snap, index,
/// byte)` puts a 512 KiB block of `byte`, `start(**kw)` starts a snapshot, `done(snap)` completes it, `err(f)`
/// returns `[code, reason, status]` of the error `f()` raises. Returns standard output.
fn ebs_py(code: &str) -> String {
    let out = std::process::Command::new(util::aws::venv_python())
        .arg("-c")
        .arg(format!(
            "import boto3,json,hashlib,base64\n\
             kw=dict(endpoint_url='{}',region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t')\n\
             e=boto3.client('ebs',**kw); c=boto3.client('ec2',**kw)\n\
             for cl in (e,c): cl.meta.events.register('before-sign.*.*',lambda request,**k: request.headers.__setitem__('x-moto-account-id','210987654321'))\n\
             B=524288\n\
             def put(s,i,b):\n\
             \x20 d=bytes([b])*B\n\
             \x20 e.put_snapshot_block(SnapshotId=s,BlockIndex=i,BlockData=d,DataLength=B,ChecksumAlgorithm='SHA256',\n\
             \x20   Checksum=base64.b64encode(hashlib.sha256(d).digest()).decode())\n\
             def start(**k): return e.start_snapshot(VolumeSize=1,**k)['SnapshotId']\n\
             def done(s): e.complete_snapshot(SnapshotId=s,ChangedBlocksCount=0)\n\
             def get(s,i,t): return e.get_snapshot_block(SnapshotId=s,BlockIndex=i,BlockToken=t)['BlockData'].read()[0]\n\
             def err(f):\n\
             \x20 try: f()\n\
             \x20 except Exception as x: return [x.response['Error']['Code'],x.response.get('Reason'),x.response['ResponseMetadata']['HTTPStatusCode']]\n\
             \x20 return None\n\
             {code}",
            util::aws::moto_url()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_line(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

#[test]
fn start_snapshot_with_a_parent_holds_the_parents_blocks_plus_what_is_put() {
    let v = json_line(&ebs_py(
        "p=start(); put(p,0,1); put(p,1,2); put(p,3,3); done(p)\n\
         k=start(ParentSnapshotId=p); put(k,1,9); put(k,4,4); done(k)\n\
         blocks={b['BlockIndex']:get(k,b['BlockIndex'],b['BlockToken']) for b in e.list_snapshot_blocks(SnapshotId=k)['Blocks']}\n\
         pb={b['BlockIndex']:get(p,b['BlockIndex'],b['BlockToken']) for b in e.list_snapshot_blocks(SnapshotId=p)['Blocks']}\n\
         print(json.dumps({'child':sorted(blocks.items()),'parent':sorted(pb.items()),\n\
           'unknown':err(lambda: start(ParentSnapshotId='snap-0123456789abcdef0')),\n\
           'encrypted':err(lambda: start(ParentSnapshotId=p,Encrypted=True))}))",
    ));
    // The child: the parent's 0 and 3, its own 1 (overwritten) and 4.
    assert_eq!(
        v["child"],
        serde_json::json!([[0, 1], [1, 9], [3, 3], [4, 4]])
    );
    // The parent is unchanged.
    assert_eq!(v["parent"], serde_json::json!([[0, 1], [1, 2], [3, 3]]));
    assert_eq!(
        v["unknown"],
        serde_json::json!([
            "ResourceNotFoundException",
            "DEPENDENCY_RESOURCE_NOT_FOUND",
            404
        ])
    );
    assert_eq!(v["encrypted"][0], "ValidationException");
}

#[test]
fn list_changed_blocks_compares_both_snapshots_over_the_union_of_their_blocks() {
    // First: 0=1, 1=2, 2=3. Second (child of first): 1 rewritten with the same data, 2 changed, 5 new; a
    // third snapshot drops nothing (the API cannot delete a block: it is written as zeros), so "only in the
    // first" is checked with a first that has a block its later snapshot was never given: second → first.
    let v = json_line(&ebs_py(
        "a=start(); put(a,0,1); put(a,1,2); put(a,2,3); done(a)\n\
         b=start(ParentSnapshotId=a); put(b,1,2); put(b,2,7); put(b,5,5); done(b)\n\
         r=e.list_changed_blocks(FirstSnapshotId=a,SecondSnapshotId=b)\n\
         rev=e.list_changed_blocks(FirstSnapshotId=b,SecondSnapshotId=a)['ChangedBlocks']\n\
         cb=r['ChangedBlocks']\n\
         data=[[x['BlockIndex'], get(a,x['BlockIndex'],x['FirstBlockToken']) if 'FirstBlockToken' in x else None,\n\
                get(b,x['BlockIndex'],x['SecondBlockToken']) if 'SecondBlockToken' in x else None] for x in cb]\n\
         print(json.dumps({'data':data,'rev':[[x['BlockIndex'],'FirstBlockToken' in x,'SecondBlockToken' in x] for x in rev],\n\
           'bs':r['BlockSize'],'vs':r['VolumeSize'],'next':r.get('NextToken'),'exp':'ExpiryTime' in r,\n\
           'all':[x['BlockIndex'] for x in e.list_changed_blocks(SecondSnapshotId=b)['ChangedBlocks']]}))",
    ));
    // Identical block 0 (inherited) and 1 (rewritten with the same bytes) are not listed; 2 changed (both
    // tokens, each reading its own snapshot's data); 5 is only in the second (no FirstBlockToken).
    assert_eq!(v["data"], serde_json::json!([[2, 3, 7], [5, null, 5]]));
    // Swapped, block 5 is only in the first: no SecondBlockToken.
    assert_eq!(
        v["rev"],
        serde_json::json!([[2, true, true], [5, true, false]])
    );
    assert_eq!(v["bs"], 524288);
    assert_eq!(v["vs"], 1);
    assert_eq!(v["next"], serde_json::Value::Null);
    assert_eq!(v["exp"], true);
    // Without FirstSnapshotId: every block of the second.
    assert_eq!(v["all"], serde_json::json!([0, 1, 2, 5]));
}

#[test]
fn list_changed_blocks_pages_with_max_results_next_token_and_starting_block_index() {
    // 101 changed blocks (the reference's smallest MaxResults is 100): two pages.
    let v = json_line(&ebs_py(
        "a=start(); put(a,0,1); done(a)\n\
         b=start(ParentSnapshotId=a)\n\
         for i in range(1,102): put(b,i,2)\n\
         done(b)\n\
         p1=e.list_changed_blocks(FirstSnapshotId=a,SecondSnapshotId=b,MaxResults=100)\n\
         p2=e.list_changed_blocks(FirstSnapshotId=a,SecondSnapshotId=b,MaxResults=100,NextToken=p1['NextToken'],StartingBlockIndex=1)\n\
         s=e.list_changed_blocks(FirstSnapshotId=a,SecondSnapshotId=b,StartingBlockIndex=95)\n\
         print(json.dumps({'p1':[x['BlockIndex'] for x in p1['ChangedBlocks']],'p2':[x['BlockIndex'] for x in p2['ChangedBlocks']],\n\
           'p2next':p2.get('NextToken'),'s':[x['BlockIndex'] for x in s['ChangedBlocks']],\n\
           'bad':err(lambda: e.list_changed_blocks(FirstSnapshotId=a,SecondSnapshotId=b,NextToken='bm90IGEgdG9rZW4='))}))",
    ));
    let p1: Vec<u64> = serde_json::from_value(v["p1"].clone()).unwrap();
    assert_eq!(p1, (1..=100).collect::<Vec<u64>>());
    // NextToken wins over StartingBlockIndex.
    assert_eq!(v["p2"], serde_json::json!([101]));
    assert_eq!(v["p2next"], serde_json::Value::Null);
    let s: Vec<u64> = serde_json::from_value(v["s"].clone()).unwrap();
    assert_eq!(s, (95..=101).collect::<Vec<u64>>());
    assert_eq!(
        v["bad"],
        serde_json::json!(["ValidationException", "INVALID_PAGE_TOKEN", 400])
    );
}

#[test]
fn list_changed_blocks_refuses_snapshots_of_different_lineages() {
    let v = json_line(&ebs_py(
        "a=start(); put(a,0,1); done(a)\n\
         b=start(); put(b,0,1); done(b)\n\
         k=start(ParentSnapshotId=a); done(k)\n\
         print(json.dumps({'unrelated':err(lambda: e.list_changed_blocks(FirstSnapshotId=a,SecondSnapshotId=b)),\n\
           'cousin':err(lambda: e.list_changed_blocks(FirstSnapshotId=k,SecondSnapshotId=b)),\n\
           'related':err(lambda: e.list_changed_blocks(FirstSnapshotId=a,SecondSnapshotId=k)),\n\
           'unknown':err(lambda: e.list_changed_blocks(FirstSnapshotId=a,SecondSnapshotId='snap-0123456789abcdef0'))}))",
    ));
    assert_eq!(
        v["unrelated"],
        serde_json::json!(["ValidationException", "UNRELATED_SNAPSHOTS", 400])
    );
    assert_eq!(v["cousin"], v["unrelated"]);
    assert_eq!(v["related"], serde_json::Value::Null);
    assert_eq!(
        v["unknown"],
        serde_json::json!(["ResourceNotFoundException", "SNAPSHOT_NOT_FOUND", 404])
    );
}

#[test]
fn block_size_is_512_kib_and_ec2_sees_pending_until_complete() {
    let v = json_line(&ebs_py(
        "r=e.start_snapshot(VolumeSize=1); s=r['SnapshotId']; put(s,0,1)\n\
         st=lambda: c.describe_snapshots(SnapshotIds=[s])['Snapshots'][0]['State']\n\
         before=st(); done(s)\n\
         k=start(ParentSnapshotId=s)\n\
         vol=lambda x: c.describe_snapshots(SnapshotIds=[x])['Snapshots'][0]['VolumeId']\n\
         print(json.dumps({'start':r['BlockSize'],'list':e.list_snapshot_blocks(SnapshotId=s)['BlockSize'],\n\
           'before':before,'after':st(),'same_volume':vol(s)==vol(k)}))",
    ));
    assert_eq!(v["start"], 524288);
    assert_eq!(v["list"], 524288);
    assert_eq!(v["before"], "pending");
    assert_eq!(v["after"], "completed");
    // A child is a snapshot of its parent's volume (one lineage), as DescribeSnapshots(volume-id) lists it.
    assert_eq!(v["same_volume"], true);
}
